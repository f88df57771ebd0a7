"""One handler per task; ``HANDLERS`` maps a task name to its class, imported only when a card needs it."""
from __future__ import annotations

import importlib

HANDLERS = {
    "osteo": "daemon.handlers.osteo:OsteoHandler",
    "scar": "daemon.handlers.scar:ScarHandler",
    "handbone": "daemon.handlers.handbone:HandboneHandler",
    "brixia": "daemon.handlers.brixia:BrixiaHandler",
}


def handler_class(task: str):
    """The handler class serving ``task`` (KeyError when this version has none)."""
    module_name, _, class_name = HANDLERS[task].partition(":")
    return getattr(importlib.import_module(module_name), class_name)
