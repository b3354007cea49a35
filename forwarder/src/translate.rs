//! Services + EndpointSlices -> desired datapath state (being written).
