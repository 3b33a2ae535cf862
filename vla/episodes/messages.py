"""ROS 2 messages without ROS: field dicts (vla.episodes.topics) -> rosbags message objects -> CDR."""
from __future__ import annotations

import numpy as np
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.base import Nodetype

# Standard message definitions are the same in every ROS 2 distribution since Humble.
TYPESTORE = get_typestore(Stores.ROS2_JAZZY)

_NUMPY = {"bool": np.bool_, "byte": np.uint8, "char": np.uint8, "int8": np.int8, "uint8": np.uint8,
          "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "uint32": np.uint32,
          "int64": np.int64, "uint64": np.uint64, "float32": np.float32, "float64": np.float64}


def build(msgtype: str, fields: dict, typestore=TYPESTORE):
    """The message object of type `msgtype` from a dict holding every one of its fields."""
    kwargs = {}
    for name, (nodetype, detail) in typestore.fielddefs[msgtype][1]:
        if name not in fields:
            raise KeyError(f"{msgtype}: field {name!r} missing")
        value = fields[name]
        if nodetype == Nodetype.NAME:
            value = build(detail, value, typestore)
        elif nodetype in (Nodetype.ARRAY, Nodetype.SEQUENCE):
            item_type, item_detail = detail[0]
            if item_type == Nodetype.NAME:
                value = [build(item_detail, item, typestore) for item in value]
            elif item_detail[0] != "string":
                value = np.asarray(value, dtype=_NUMPY[item_detail[0]])
        kwargs[name] = value
    return typestore.types[msgtype](**kwargs)


def serialize(msgtype: str, fields: dict) -> memoryview:
    return TYPESTORE.serialize_cdr(build(msgtype, fields), msgtype)
