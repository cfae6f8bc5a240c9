"""Wire models of the surfaces only the gateway speaks: Anthropic Messages, OpenAI Responses."""
