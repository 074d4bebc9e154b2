"""
Several rproxy nodes acting as one tunnel server, through Redis.

  - L{rproxy.cluster.registry}: pure state.  What this node writes about
    its agents (a snapshot per node, renewed every heartbeat) and how the
    snapshots of the other nodes become remote agent sessions a tunnel's
    registry can choose.
  - L{rproxy.cluster.node}: the I/O.  L{ClusterNode} writes this node's
    snapshot with a TTL, reads everybody's, listens on its own pub/sub
    channel for stream requests and on the cluster's for session kicks.

No consensus of our own: Redis holds the shared state, and a node that
loses Redis goes on serving its own agents alone.
"""
