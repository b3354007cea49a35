//! Reading Service and EndpointSlice manifests (being written).
