"""Reads a SentencePiece `spiece.model` (a protobuf `ModelProto`) without sentencepiece or protobuf.

Only what a T5/UMT5 tokenizer needs is kept: the pieces (text, score, type), the model type and the
normaliser's precompiled charsmap. The protobuf wire format is small enough to walk by hand
(varints, fixed 32/64-bit values and length-delimited fields), which keeps `tokenizers` the only
runtime dependency of the tokenizer. Field numbers are those of sentencepiece_model.proto.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

# ModelProto fields
PIECES, TRAINER_SPEC, NORMALIZER_SPEC = 1, 2, 3
# ModelProto.SentencePiece fields
PIECE_TEXT, PIECE_SCORE, PIECE_TYPE = 1, 2, 3
# TrainerSpec / NormalizerSpec fields
MODEL_TYPE, PRECOMPILED_CHARSMAP = 3, 2

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
UNIGRAM = 1  # TrainerSpec.ModelType
MODEL_TYPE_NAMES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}

VARINT, FIXED64, LENGTH_DELIMITED, FIXED32 = 0, 1, 2, 5


class SpieceError(ValueError):
    """Bytes that are not a SentencePiece model; the caller adds the file name."""


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    type: int = NORMAL


@dataclass(frozen=True)
class SpieceModel:
    pieces: list[Piece]
    model_type: int = UNIGRAM
    precompiled_charsmap: bytes | None = None

    @property
    def control_pieces(self) -> list[str]:
        return [p.text for p in self.pieces if p.type == CONTROL]


def parse_spiece_model(data: bytes) -> SpieceModel:
    """The pieces, model type and charsmap of a serialized ModelProto; SpieceError if it is not one."""
    pieces, model_type, charsmap, has_trainer_spec = [], UNIGRAM, None, False
    for number, wire, value in _fields(data):
        if number == PIECES and wire == LENGTH_DELIMITED:
            pieces.append(_piece(value))
        elif number == TRAINER_SPEC and wire == LENGTH_DELIMITED:
            has_trainer_spec = True
            model_type = next((v for n, w, v in _fields(value) if n == MODEL_TYPE and w == VARINT), model_type)
        elif number == NORMALIZER_SPEC and wire == LENGTH_DELIMITED:
            charsmap = next((v for n, w, v in _fields(value) if n == PRECOMPILED_CHARSMAP and w == LENGTH_DELIMITED),
                            charsmap)
    if not pieces:
        raise SpieceError("no vocabulary pieces (not a SentencePiece model)")
    # The trainer spec is written after the pieces: without it the file was cut short.
    if not has_trainer_spec:
        raise SpieceError("no trainer spec (truncated, or not a SentencePiece model)")
    return SpieceModel(pieces, model_type, charsmap or None)


def _piece(data: bytes) -> Piece:
    text, score, kind = None, 0.0, NORMAL
    for number, wire, value in _fields(data):
        if number == PIECE_TEXT and wire == LENGTH_DELIMITED:
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                raise SpieceError("a piece is not valid UTF-8") from None
        elif number == PIECE_SCORE and wire == FIXED32:
            score = struct.unpack("<f", value)[0]
        elif number == PIECE_TYPE and wire == VARINT:
            kind = value
    if text is None:
        raise SpieceError("a vocabulary piece has no text")
    return Piece(text, score, kind)


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of each field of one message: ints for varints, bytes otherwise."""
    position, end = 0, len(data)
    while position < end:
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise SpieceError("field number 0 (corrupt protobuf)")
        if wire == VARINT:
            value, position = _varint(data, position)
        elif wire in (FIXED64, FIXED32):
            size = 8 if wire == FIXED64 else 4
            value, position = data[position:position + size], position + size
        elif wire == LENGTH_DELIMITED:
            size, position = _varint(data, position)
            value, position = data[position:position + size], position + size
        else:
            raise SpieceError(f"unsupported protobuf wire type {wire} (corrupt file)")
        if position > end:
            raise SpieceError("truncated protobuf message")
        yield number, wire, value


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= len(data) or shift > 63:
            raise SpieceError("truncated or overlong varint (corrupt protobuf)")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
        shift += 7
