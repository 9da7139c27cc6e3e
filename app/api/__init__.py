"""The REST API: one router per resource, pydantic models for every request and response."""
