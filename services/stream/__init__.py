"""The stream processor process (`rankloop stream`): `join.py` holds the pure join and labelling
step, `app.py` the faust agents that run it."""
