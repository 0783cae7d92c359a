"""Serving front ends over one ChatEngine: an OpenAI-compatible HTTP API and a web page.

    seechat serve --model runs/toyworld/model          # POST /v1/chat/completions, GET /v1/models, GET /health
    seechat web --model runs/toyworld/model            # a Gradio page: upload an image, chat, streaming

The engine knows nothing about HTTP: `messages` turns an OpenAI request's messages into the engine's
messages and images, `scheduler` runs the engine on one worker thread behind a bounded queue, `api`
is the FastAPI app and its command, `web` the Gradio page and its command.
"""
