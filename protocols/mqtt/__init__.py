"""MQTT contracts (versioned topic trees and payload schemas), shared by the gateway and the simulators."""
