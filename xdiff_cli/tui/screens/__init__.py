"""One screen per module: run picker, empty states, feature browser, steering chat, help."""
