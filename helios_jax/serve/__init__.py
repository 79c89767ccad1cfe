"""`helios-jax serve`: a Gradio web demo that streams each chunk into the page as it is decoded and
takes new prompts between chunks. Modules: validation (request checks), live_prompt (the per-request
prompt slot), growing_video (the mp4 shown while it grows), worker (the shared pipelines and the
device queue), app (the page layout and its handlers)."""
