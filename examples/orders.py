"""Sample data function for the `big-orders` alert: the orders placed in the hour before a slot.

The sample warehouse (examples/warehouse.sql) has orders by day only, and a database seeded by an
older version is never seeded again, so the hourly orders come from this function instead: the same
products and prices, generated from the hour itself, so that previews and tests see the same numbers.
About one hour in three has an order over 1,000 EUR (three or four espresso machines).
"""

from __future__ import annotations

from datetime import datetime, timedelta

PRODUCTS = (
    ("Espresso machine", 349.00),
    ("Grinder", 129.50),
    ("Milk jug", 14.90),
    ("Beans 1 kg", 21.00),
    ("Tamper", 34.00),
    ("Descaler", 9.95),
    ("Cups (6)", 27.00),
)
REGIONS = ("North", "South", "East", "West", "Central")


def last_hour(slot: datetime, report: str) -> list[dict[str, object]]:
    """The orders placed in the hour before SLOT, oldest first: time, region, product, quantity, amount."""
    start = slot.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1)
    seed = int(start.timestamp()) // 3600
    rows: list[dict[str, object]] = []
    for i in range(3 + seed % 5):
        product, price = PRODUCTS[(seed * 5 + i * 3) % len(PRODUCTS)]
        quantity = 1 + (seed * 7 + i * 13) % 4
        rows.append(
            {
                "time": (start + timedelta(minutes=(seed * 11 + i * 17) % 60)).strftime("%H:%M"),
                "region": REGIONS[(seed + i * 3) % len(REGIONS)],
                "product": product,
                "quantity": quantity,
                "amount": round(price * quantity, 2),
            }
        )
    return sorted(rows, key=lambda r: str(r["time"]))
