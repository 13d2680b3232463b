"""`pagedq serve`: an OpenAI-compatible HTTP producer of jobs (FastAPI on uvicorn)."""
