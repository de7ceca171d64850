"""adw-agent: watches one AI developer workflow run and delivers what happens as events."""

__version__ = "0.1.0"
