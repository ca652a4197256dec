-- Sample warehouse for the shipped reports: about 45 orders a day from 60 days ago to a year ahead,
-- generated deterministically (no random()), so previews and tests see the same numbers.
CREATE TABLE regions (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
INSERT INTO regions (id, name) VALUES (0, 'North'), (1, 'South'), (2, 'East'), (3, 'West'), (4, 'Central');

CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL NOT NULL);
INSERT INTO products (id, name, price) VALUES
  (0, 'Espresso machine', 349.00), (1, 'Grinder', 129.50), (2, 'Milk jug', 14.90),
  (3, 'Beans 1 kg', 21.00), (4, 'Tamper', 34.00), (5, 'Descaler', 9.95), (6, 'Cups (6)', 27.00);

CREATE TABLE orders (
  id INTEGER PRIMARY KEY,
  day TEXT NOT NULL,
  region TEXT NOT NULL,
  product TEXT NOT NULL,
  quantity INTEGER NOT NULL,
  amount REAL NOT NULL
);
CREATE INDEX ix_orders_day ON orders (day);

WITH RECURSIVE
  days(n, day) AS (
    SELECT 0, date('now', '-60 days')
    UNION ALL SELECT n + 1, date(day, '+1 day') FROM days WHERE n < 425
  ),
  lines(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM lines WHERE k < 59)
INSERT INTO orders (day, region, product, quantity, amount)
SELECT d.day,
       r.name,
       p.name,
       1 + ((d.n * 7 + l.k * 13) % 4),
       round(p.price * (1 + ((d.n * 7 + l.k * 13) % 4)), 2)
FROM days d
JOIN lines l ON l.k < 35 + (d.n * 11) % 25
JOIN regions r ON r.id = (d.n + l.k * 3) % 5
JOIN products p ON p.id = (d.n * 5 + l.k) % 7;
