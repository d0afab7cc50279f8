"""The API server's routes: a dozen lines each, from HTTP to a serving class in app state."""
