"""The core every surface sits on: the typed client (client), the engine thread (runner),
engine events (events), prepared inputs (inputs) and the one event collector (collector)."""
