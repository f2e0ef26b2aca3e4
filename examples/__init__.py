"""Worked examples built on the engine. The engine never imports them."""
