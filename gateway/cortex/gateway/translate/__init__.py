"""Pure translation between the API dialects clients speak and the OpenAI chat API neurons serve.

`anthropic` (Messages API) and `responses` (OpenAI Responses API) each offer to_chat_request,
from_chat_response, a stream translator and encode_sse; nothing here does I/O.
"""
