"""tp2 wrong solution: skips the header by hand, and one data row with it.

A classic: reading with csv.reader, the student drops the header with
next(), then drops the first restaurant too with a second next().
"""

import csv
from collections import defaultdict

with open("/tmp/RESTAURANTES.CSV", newline="", encoding="utf-8") as f:
    reader = csv.reader(f)
    next(reader)
    next(reader)  # bug: one row too many
    rows = list(reader)

by_barrio = defaultdict(list)
for row in rows:
    by_barrio[row[2]].append(row)

for barrio in sorted(by_barrio):
    group = by_barrio[barrio]
    rating = sum(float(r[5]) for r in group) / len(group)
    price = sum(int(r[4]) for r in group) / len(group)
    print(f"{barrio}: {len(group)} restaurantes, puntuacion {rating:.2f}, precio {round(price)}")

parrillas = [r for r in rows if r[3] == "parrilla" and int(r[6]) >= 100]
parrillas.sort(key=lambda r: (-float(r[5]), int(r[4]), int(r[0])))
for r in parrillas[:3]:
    print(f"top: {r[1]} ({r[2]}) {r[5]} ${r[4]}")
