"""Multi-turn agent-loop OPD: the tools a student can call during its rollout (``agent.tools``).

Nothing is imported here, so importing ``agent`` stays cheap; the tool modules themselves import
verl's ``BaseTool`` (and with it torch).
"""
