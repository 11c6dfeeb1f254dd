"""The sandbox's network: namespaces and veths, the nftables service proxy, cluster DNS."""
