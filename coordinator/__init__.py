"""Receives site updates, checks and aggregates them (Flower-style strategies), runs rounds with
quorum, deadlines and crash-resume, and hands each round's model to the registry."""
