"""Fixtures that run real servers on free loopback ports. Never mocks."""
