"""The face service: durable gallery (SQLite) with a FAISS cache, REST API, batch enrollment. Imports
``model``."""
