"""Offline demos of fd-onestep: small bundled models and data that run end to end on a CPU in minutes.

Each demo lives in a subpackage of its own (:mod:`fd_onestep.demos.digits`) with its assets and its training
recipes; the library (everything else under ``fd_onestep``) never imports a demo.
"""
