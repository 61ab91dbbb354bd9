"""Inventory's domain errors. ``code`` is stable and machine-readable.

Constructor arguments are kept in ``args`` so the errors survive pickling and
Celery's JSON result encoding, which rebuild an exception as ``cls(*args)``.
"""


class InventoryError(Exception):
    """Base of inventory's errors."""

    code = "inventory_error"

    @property
    def message(self) -> str:
        return str(self)


class UnknownItem(InventoryError):
    code = "unknown_item"

    def __init__(self, sku: str) -> None:
        super().__init__(sku)
        self.sku = sku

    def __str__(self) -> str:
        return f"No item with SKU {self.sku!r}."


class InvalidQuantity(InventoryError):
    code = "invalid_quantity"

    def __init__(self, quantity: object) -> None:
        super().__init__(quantity)
        self.quantity = quantity

    def __str__(self) -> str:
        return f"Quantity must be a whole number of at least 1, got {self.quantity!r}."


class OutOfStock(InventoryError):
    code = "out_of_stock"

    def __init__(self, sku: str, requested: int, available: int) -> None:
        super().__init__(sku, requested, available)
        self.sku = sku
        self.requested = requested
        self.available = available

    def __str__(self) -> str:
        return (
            f"Not enough stock for {self.sku!r}: requested {self.requested}, "
            f"available {self.available}."
        )


class HoldNotFound(InventoryError):
    code = "hold_not_found"

    def __init__(self, reference: str) -> None:
        super().__init__(reference)
        self.reference = reference

    def __str__(self) -> str:
        return f"No hold with reference {self.reference!r}."


class InvalidHoldState(InventoryError):
    code = "invalid_hold_state"

    def __init__(self, reference: str, status: str, action: str) -> None:
        super().__init__(reference, status, action)
        self.reference = reference
        self.status = status
        self.action = action

    def __str__(self) -> str:
        return f"Hold {self.reference!r} is {self.status}; it cannot be {self.action}."
