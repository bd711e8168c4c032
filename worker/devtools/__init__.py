"""Tools for the demo, the tests and the benches (an embedded Redis, loopback ports, a bandwidth-capping TCP
proxy, sample models). Nothing in the engine or the service core imports them."""
