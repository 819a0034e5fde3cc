"""Usage ledger, pricing, the Stripe meter pusher, webhooks and the billing portal."""
