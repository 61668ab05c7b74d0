"""What plugin instances may use: memory limits (``limits``, ``cgroups``), figures read from
``/proc`` (``procfs``) and the monitor that samples them and runs the watchdogs (``monitor``).

Submodules are imported by name: ``limits`` is needed by the settings, which the rest import.
"""
