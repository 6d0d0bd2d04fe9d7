"""The standard library of mixers (*.mx), shipped as package data."""
