"""One module per `helios-jax` subcommand: its parser (`add_command`) and its `run`. cli.py builds the parser from them."""
