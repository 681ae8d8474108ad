"""The stream app: validates clicks, keeps user state, serves recommendations (no torch)."""
