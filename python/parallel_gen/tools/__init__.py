"""Tool calls: the tools offered (spec), each template family's call format (formats),
and a call's plan joining them to a chat template (plan)."""

from .formats import FORMATS, GENERIC, Constraint, ParsedCall, ParsedReply, ToolFormat, format_for, format_named
from .plan import ToolPlan
from .spec import ChoiceMode, Tool, ToolRequest, tool_request

__all__ = ["FORMATS", "GENERIC", "ChoiceMode", "Constraint", "ParsedCall", "ParsedReply", "Tool", "ToolFormat",
           "ToolPlan", "ToolRequest", "format_for", "format_named", "tool_request"]
