"""The web page and JSON API of `miniclip serve` (needs the `serve` extra: starlette, uvicorn, python-multipart)."""
