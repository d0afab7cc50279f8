"""Request handling of the API server, free of FastAPI: requests in, responses or streams out."""
