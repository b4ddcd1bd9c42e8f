"""Scale-out: running work across processes and machines. It receives what to run (a function or a spec)
and never imports the application."""
