"""tp2 reference solution: per-barrio figures from /tmp/RESTAURANTES.CSV.

For each barrio, in alphabetical order: how many restaurants, their mean
rating (2 decimals) and mean price (rounded); then the three best-rated
parrillas with at least 100 reviews (ties: cheaper first, then by id).
"""

import csv
from collections import defaultdict

with open("/tmp/RESTAURANTES.CSV", newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))

by_barrio = defaultdict(list)
for row in rows:
    by_barrio[row["barrio"]].append(row)

for barrio in sorted(by_barrio):
    group = by_barrio[barrio]
    rating = sum(float(r["puntuacion"]) for r in group) / len(group)
    price = sum(int(r["precio_medio"]) for r in group) / len(group)
    print(f"{barrio}: {len(group)} restaurantes, puntuacion {rating:.2f}, precio {round(price)}")

parrillas = [r for r in rows if r["tipo"] == "parrilla" and int(r["resenas"]) >= 100]
parrillas.sort(key=lambda r: (-float(r["puntuacion"]), int(r["precio_medio"]), int(r["id"])))
for r in parrillas[:3]:
    print(f"top: {r['nombre']} ({r['barrio']}) {r['puntuacion']} ${r['precio_medio']}")
