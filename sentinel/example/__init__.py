"""A small Starlette app that shows what sentinel reports (served by the Quick start)."""
