"""Services: each role is a loop over messages, unaware of which transport carries them."""
