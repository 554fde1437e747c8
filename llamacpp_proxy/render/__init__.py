"""Rendering: chat templates, tool calls and output constraints, messages -> prompt."""
