"""Integrity: fs-verity-compatible Merkle trees and signatures over the image root.

Pure code over bytes: nothing here touches files, FUSE or the network.
"""
