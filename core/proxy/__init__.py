"""One exchange: the chain of filters, the per-request context, forwarding rules, routes."""
