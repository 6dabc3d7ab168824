"""Inputs: ZeroMQ subscriptions to engines' KV-event streams."""
