"""The surfaces room: the ways in besides a plain paid HTTP call. Each reuses the pipeline's chain
through the app's own ASGI stack; none restates it.

    discovery/          /tools, /openapi.json, /.well-known/x402, /discovery/resources, /llms.txt
    mcp.py              ``McpEndpoint``: MCP over streamable HTTP, paid calls through the app
    search.py           ``ToolSearch``: tools ranked for a few words (/tools?q=, MCP search_tools)
    facilitator_api.py  the served facilitator: /facilitator/supported, /verify, /settle
"""

from gateway.surfaces.discovery import Discovery, ToolRequest, tool_request
from gateway.surfaces.facilitator_api import facilitator_routes
from gateway.surfaces.mcp import McpEndpoint
from gateway.surfaces.search import ToolSearch

__all__ = ["Discovery", "McpEndpoint", "ToolRequest", "ToolSearch", "facilitator_routes", "tool_request"]
