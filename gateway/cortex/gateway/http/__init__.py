"""The HTTP layer: routes read a request, hand it to the proxy, and return its response."""
