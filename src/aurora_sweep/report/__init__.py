"""What a finished study gives its user: the ranking and the export (`best`), an adapter scored
again (`evaluate`), the HTML report page (`html`), NetCDF forecasts (`forecast`) and the
exported adapter in MLflow's model registry (`registry`).

May import every stage below it, `sweep` included (the ranking reads the trials' records).
"""
