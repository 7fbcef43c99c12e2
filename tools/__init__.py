"""The tool protocol and registry, tool-call parsing, and built-in tools (installed as `alp_agents.tools`)."""
