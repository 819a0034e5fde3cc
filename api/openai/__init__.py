"""OpenAI-compatible endpoints under `/openai/v1`: point an official client at us."""
