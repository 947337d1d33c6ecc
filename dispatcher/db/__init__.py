"""The database side of the dispatcher: schema, engine, and plain store functions taking a connection."""
