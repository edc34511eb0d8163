"""RESTAURANTES.CSV for tp2: plausible restaurant rows from a fixed seed.

python examples/tp2/dataset.py OUT.CSV [--rows N]
"""

from __future__ import annotations

import argparse
import csv
import io
import random

BARRIOS = [
    "Almagro", "Balvanera", "Belgrano", "Boedo", "Caballito", "Colegiales",
    "Flores", "Monserrat", "Nunez", "Palermo", "Recoleta", "San Nicolas",
    "San Telmo", "Villa Crespo", "Villa Urquiza",
]  # fmt: skip
TIPOS = ["parrilla", "pizzeria", "cafe", "bodegon", "sushi", "vegano", "heladeria", "bar"]
NOMBRES = ["El", "La", "Don", "Dona", "Los", "Las", "Gran", "Viejo", "Nuevo", "Mi"]
SUSTANTIVOS = [
    "Fogon", "Esquina", "Patio", "Almacen", "Rincon", "Farol", "Molino", "Puerto",
    "Tano", "Gallego", "Buen Gusto", "Sabor", "Mercado", "Club", "Cuartito",
]  # fmt: skip
FIELDS = ["id", "nombre", "barrio", "tipo", "precio_medio", "puntuacion", "resenas", "telefono"]


def generate(rows: int = 40_000, seed: int = 2) -> bytes:
    """The dataset as CSV bytes; the same seed always gives the same bytes."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible dataset, not a secret
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(FIELDS)
    for i in range(1, rows + 1):
        tipo = rng.choice(TIPOS)
        base = {"parrilla": 9000, "sushi": 12000, "cafe": 3500, "heladeria": 3000}.get(tipo, 6000)
        writer.writerow(
            [
                i,
                f"{rng.choice(NOMBRES)} {rng.choice(SUSTANTIVOS)} {i}",
                rng.choice(BARRIOS),
                tipo,
                max(800, int(rng.gauss(base, base * 0.25))),
                f"{min(5.0, max(1.0, rng.gauss(3.8, 0.6))):.1f}",
                rng.randint(0, 2500),
                f"011-{rng.randint(4000, 6999)}-{rng.randint(0, 9999):04d}",
            ]
        )
    return out.getvalue().encode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--rows", type=int, default=40_000)
    args = parser.parse_args()
    with open(args.out, "wb") as f:
        f.write(generate(args.rows))


if __name__ == "__main__":
    main()
