"""The runstate worker runtime."""
