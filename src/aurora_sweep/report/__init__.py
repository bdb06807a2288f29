"""What a finished study gives its user: the ranking and the export (`best`), an adapter scored
again (`evaluate`), the HTML report page (`html`) and NetCDF forecasts (`forecast`).

May import every stage below it, `sweep` included (the ranking reads the trials' records).
"""
